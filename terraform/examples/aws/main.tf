# Strata on AWS, end to end: a VPC with an S3 gateway endpoint, the log's bucket and
# the brokers' least-privilege policy, PostgreSQL for metadata, an ECR repository for
# the image, and an EKS cluster running the Helm chart with a broker Deployment and
# autoscaler per zone. docs/deploy.md walks through it.

provider "aws" {
  region = var.region
  default_tags {
    tags = merge(var.tags, { "app.kubernetes.io/part-of" = "strata", "strata/deployment" = var.name })
  }
}

# Terraform installs the chart through the new cluster's API, with the caller's AWS
# identity (the cluster's creator is its administrator).
provider "helm" {
  kubernetes = {
    host                   = module.fleet.cluster_endpoint
    cluster_ca_certificate = base64decode(module.fleet.cluster_certificate_authority)
    exec = {
      api_version = "client.authentication.k8s.io/v1beta1"
      command     = "aws"
      args        = ["eks", "get-token", "--region", var.region, "--cluster-name", module.fleet.cluster_name]
    }
  }
}

data "aws_caller_identity" "current" {}

locals {
  bucket_name = var.bucket_name != "" ? var.bucket_name : "${var.name}-log-${data.aws_caller_identity.current.account_id}"
}

module "network" {
  source = "../../modules/network"

  name  = var.name
  cidr  = var.vpc_cidr
  zones = var.zones
}

module "storage" {
  source = "../../modules/storage"

  bucket_name = local.bucket_name
  prefix      = var.name
}

module "metadata" {
  source = "../../modules/metadata"

  name                      = "${var.name}-metadata"
  vpc_id                    = module.network.vpc_id
  subnet_ids                = module.network.private_subnet_ids
  client_security_group_ids = [module.fleet.cluster_security_group_id]
  instance_class            = var.db_instance_class
  deletion_protection       = var.deletion_protection
}

# Immutable tags: a tag names one build forever, so a rollout is exactly one image.
resource "aws_ecr_repository" "strata" {
  name                 = var.name
  image_tag_mutability = "IMMUTABLE"

  image_scanning_configuration {
    scan_on_push = true
  }

  encryption_configuration {
    encryption_type = "KMS"
  }
}

resource "aws_ecr_lifecycle_policy" "strata" {
  repository = aws_ecr_repository.strata.name
  policy = jsonencode({
    rules = [{
      rulePriority = 1
      description  = "Keep the 50 newest images"
      selection = {
        tagStatus   = "any"
        countType   = "imageCountMoreThan"
        countNumber = 50
      }
      action = { type = "expire" }
    }]
  })
}

module "fleet" {
  source = "../../modules/fleet"

  name                         = var.name
  kubernetes_version           = var.kubernetes_version
  vpc_id                       = module.network.vpc_id
  vpc_cidr                     = module.network.vpc_cidr
  private_subnet_ids_by_zone   = module.network.private_subnet_ids_by_zone
  endpoint_public_access_cidrs = var.api_allowed_cidrs
  client_cidrs                 = var.client_cidrs
  node_instance_types          = var.node_instance_types
  nodes_per_zone               = var.nodes_per_zone

  chart_path        = "${path.module}/../../../deploy/helm/strata"
  image_repository  = aws_ecr_repository.strata.repository_url
  image_tag         = var.image_tag
  object_store_url  = module.storage.object_store_url
  broker_policy_arn = module.storage.broker_policy_arn
  metadata_url      = module.metadata.url
  chart_values      = var.chart_values
}
