# The metadata store: PostgreSQL on RDS, Multi-AZ, encrypted with its own key, in
# private subnets behind a security group that admits only the brokers' nodes.

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

locals {
  port   = 5432
  family = "postgres${split(".", var.engine_version)[0]}"
}

resource "random_password" "master" {
  length  = 40
  special = false
}

resource "aws_kms_key" "db" {
  description         = "${var.name}: Strata metadata database"
  enable_key_rotation = true
  policy              = data.aws_iam_policy_document.key.json
  tags                = var.tags
}

data "aws_iam_policy_document" "key" {
  #checkov:skip=CKV_AWS_109:A key policy's Resource "*" is the key itself; this is AWS's default statement delegating access to the account's IAM policies.
  #checkov:skip=CKV_AWS_111:A key policy's Resource "*" is the key itself; this is AWS's default statement delegating access to the account's IAM policies.
  #checkov:skip=CKV_AWS_356:A key policy's Resource "*" is the key itself; this is AWS's default statement delegating access to the account's IAM policies.
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

resource "aws_db_subnet_group" "this" {
  name       = var.name
  subnet_ids = var.subnet_ids
  tags       = var.tags
}

resource "aws_security_group" "db" {
  name        = "${var.name}-db"
  description = "PostgreSQL of ${var.name}: brokers only"
  vpc_id      = var.vpc_id
  tags        = var.tags
}

# count, not for_each: the groups' ids are often unknown until the cluster exists.
resource "aws_vpc_security_group_ingress_rule" "brokers" {
  count                        = length(var.client_security_group_ids)
  security_group_id            = aws_security_group.db.id
  description                  = "PostgreSQL from the brokers"
  ip_protocol                  = "tcp"
  from_port                    = local.port
  to_port                      = local.port
  referenced_security_group_id = var.client_security_group_ids[count.index]
}

resource "aws_db_parameter_group" "this" {
  name   = var.name
  family = local.family
  tags   = var.tags

  parameter {
    name  = "rds.force_ssl"
    value = var.force_ssl ? "1" : "0"
  }

  # Slow statements and every connection in the PostgreSQL log (exported to CloudWatch).
  parameter {
    name  = "log_min_duration_statement"
    value = "250"
  }

  parameter {
    name  = "log_statement"
    value = "ddl"
  }

  parameter {
    name  = "log_connections"
    value = "1"
  }
}

data "aws_iam_policy_document" "monitoring_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["monitoring.rds.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "monitoring" {
  name               = "${var.name}-rds-monitoring"
  assume_role_policy = data.aws_iam_policy_document.monitoring_assume.json
  tags               = var.tags
}

resource "aws_iam_role_policy_attachment" "monitoring" {
  role       = aws_iam_role.monitoring.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/service-role/AmazonRDSEnhancedMonitoringRole"
}

resource "aws_db_instance" "this" {
  #checkov:skip=CKV2_AWS_69:Encryption in transit waits for TLS in the broker's PostgreSQL client (var.force_ssl); the connection never leaves the VPC's private subnets.
  identifier     = var.name
  engine         = "postgres"
  engine_version = var.engine_version
  instance_class = var.instance_class
  db_name        = var.database_name
  username       = var.username
  password       = random_password.master.result
  port           = local.port

  allocated_storage     = var.allocated_storage_gb
  max_allocated_storage = var.max_allocated_storage_gb
  storage_type          = "gp3"
  storage_encrypted     = true
  kms_key_id            = aws_kms_key.db.arn

  multi_az               = var.multi_az
  db_subnet_group_name   = aws_db_subnet_group.this.name
  vpc_security_group_ids = [aws_security_group.db.id]
  publicly_accessible    = false
  parameter_group_name   = aws_db_parameter_group.this.name

  iam_database_authentication_enabled = true
  auto_minor_version_upgrade          = true
  backup_retention_period             = var.backup_retention_days
  copy_tags_to_snapshot               = true
  deletion_protection                 = var.deletion_protection
  skip_final_snapshot                 = false
  final_snapshot_identifier           = "${var.name}-final"

  enabled_cloudwatch_logs_exports       = ["postgresql", "upgrade"]
  monitoring_interval                   = 30
  monitoring_role_arn                   = aws_iam_role.monitoring.arn
  performance_insights_enabled          = true
  performance_insights_kms_key_id       = aws_kms_key.db.arn
  performance_insights_retention_period = 7

  tags = var.tags
}
