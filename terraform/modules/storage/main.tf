# The bucket holding the log: owner-enforced (no ACLs), private, encrypted with its own
# KMS key, reachable over TLS only, with a lifecycle that aborts abandoned multipart
# uploads and expires old versions; and the least-privilege policy brokers get.

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

resource "aws_kms_key" "bucket" {
  description         = "${var.bucket_name}: Strata log objects"
  enable_key_rotation = true
  policy              = data.aws_iam_policy_document.key.json
  tags                = var.tags
}

data "aws_iam_policy_document" "key" {
  #checkov:skip=CKV_AWS_109:A key policy's Resource "*" is the key itself; this is AWS's default statement delegating access to the account's IAM policies.
  #checkov:skip=CKV_AWS_111:A key policy's Resource "*" is the key itself; this is AWS's default statement delegating access to the account's IAM policies.
  #checkov:skip=CKV_AWS_356:A key policy's Resource "*" is the key itself; this is AWS's default statement delegating access to the account's IAM policies.
  # Access to the key is granted by IAM policies (the broker policy below).
  statement {
    sid       = "AccountAdministers"
    actions   = ["kms:*"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["arn:${data.aws_partition.current.partition}:iam::${data.aws_caller_identity.current.account_id}:root"]
    }
  }
}

resource "aws_kms_alias" "bucket" {
  name          = "alias/${var.bucket_name}"
  target_key_id = aws_kms_key.bucket.key_id
}

resource "aws_s3_bucket" "this" {
  #checkov:skip=CKV_AWS_18:Server access logs need a second bucket the operator owns; CloudTrail data events are the recommended audit trail (docs/deploy.md).
  #checkov:skip=CKV_AWS_144:Cross-region replication doubles storage and request cost; Strata's durability is S3's (eleven nines in one region), chosen per deployment.
  #checkov:skip=CKV2_AWS_62:Nothing consumes bucket event notifications; brokers learn of objects through the metadata store.
  bucket        = var.bucket_name
  force_destroy = var.force_destroy
  tags          = var.tags
}

resource "aws_s3_bucket_ownership_controls" "this" {
  bucket = aws_s3_bucket.this.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "this" {
  bucket                  = aws_s3_bucket.this.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "this" {
  bucket = aws_s3_bucket.this.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "this" {
  bucket = aws_s3_bucket.this.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.bucket.arn
    }
    # One data key per bucket rather than per object: KMS requests stay flat however
    # many objects the brokers write.
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "this" {
  bucket = aws_s3_bucket.this.id

  rule {
    id     = "abort-incomplete-multipart-uploads"
    status = "Enabled"
    filter {}
    abort_incomplete_multipart_upload {
      days_after_initiation = var.abort_incomplete_multipart_upload_days
    }
  }

  rule {
    id     = "expire-noncurrent-versions"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_expiration_days
    }
    expiration {
      expired_object_delete_marker = true
    }
  }

  depends_on = [aws_s3_bucket_versioning.this]
}

data "aws_iam_policy_document" "bucket" {
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.this.arn, "${aws_s3_bucket.this.arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }

  statement {
    sid       = "DenyOutdatedTls"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.this.arn, "${aws_s3_bucket.this.arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "NumericLessThan"
      variable = "s3:TlsVersion"
      values   = ["1.2"]
    }
  }
}

resource "aws_s3_bucket_policy" "this" {
  bucket = aws_s3_bucket.this.id
  policy = data.aws_iam_policy_document.bucket.json

  depends_on = [aws_s3_bucket_public_access_block.this]
}

# --- what a broker may do -----------------------------------------------------------

# Objects under the cluster's prefix only: read, write once, delete (retention and
# garbage collection), multipart uploads; listing limited to the prefix; the bucket's
# key for SSE-KMS. No bucket configuration, no other prefix, no other bucket.
data "aws_iam_policy_document" "broker" {
  statement {
    sid       = "ListClusterPrefix"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.this.arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = [var.prefix, "${var.prefix}/*"]
    }
  }

  statement {
    sid = "ClusterObjects"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = ["${aws_s3_bucket.this.arn}/${var.prefix}/*"]
  }

  statement {
    sid       = "BucketKey"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.bucket.arn]
  }
}

resource "aws_iam_policy" "broker" {
  name        = "${var.bucket_name}-broker"
  description = "Strata brokers: objects under s3://${var.bucket_name}/${var.prefix}/ only."
  policy      = data.aws_iam_policy_document.broker.json
  tags        = var.tags
}
