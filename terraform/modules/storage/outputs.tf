output "bucket_name" {
  description = "Name of the bucket."
  value       = aws_s3_bucket.this.bucket
}

output "bucket_arn" {
  description = "ARN of the bucket."
  value       = aws_s3_bucket.this.arn
}

output "object_store_url" {
  description = "The brokers' object store URL (STRATA_OBJECT_STORE)."
  value       = "s3://${aws_s3_bucket.this.bucket}/${var.prefix}"
}

output "kms_key_arn" {
  description = "ARN of the KMS key encrypting the bucket."
  value       = aws_kms_key.bucket.arn
}

output "broker_policy_arn" {
  description = "ARN of the least-privilege IAM policy for brokers (attach it to their role)."
  value       = aws_iam_policy.broker.arn
}
