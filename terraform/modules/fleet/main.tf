# The broker fleet on EKS: a cluster with encrypted secrets and full control-plane
# logs, one managed node group per zone (NVMe instance storage striped for the cache,
# IMDSv2 only), the add-ons the chart relies on (metrics-server for CPU autoscaling,
# the Pod Identity agent for S3 credentials), an IAM role the brokers get through EKS
# Pod Identity, and the Strata chart with one Deployment per zone.

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}
data "aws_region" "current" {}

locals {
  partition       = data.aws_partition.current.partition
  account_id      = data.aws_caller_identity.current.account_id
  zones           = sort(keys(var.private_subnet_ids_by_zone))
  service_account = "${var.release_name}-broker"
  client_cidrs    = length(var.client_cidrs) > 0 ? var.client_cidrs : [var.vpc_cidr]
  kafka_port      = 9092

  # AL2023 nodes stripe their instance-store NVMe disks (RAID0) and put the kubelet's
  # and containerd's state there, so emptyDir volumes (the brokers' cache) live on NVMe.
  node_user_data = <<-EOT
    MIME-Version: 1.0
    Content-Type: multipart/mixed; boundary="STRATA"

    --STRATA
    Content-Type: application/node.eks.aws

    ---
    apiVersion: node.eks.aws/v1alpha1
    kind: NodeConfig
    spec:
      instance:
        localStorage:
          strategy: RAID0

    --STRATA--
  EOT

  chart_values = {
    image = {
      repository = var.image_repository
      tag        = var.image_tag
    }
    zones = local.zones
    # per zone: one broker each at least, so three in all
    autoscaling = {
      minReplicas = 1
    }
    objectStore = {
      url = var.object_store_url
    }
    serviceAccount = {
      create = true
      name   = local.service_account
    }
    extraEnv = [
      { name = "AWS_REGION", value = data.aws_region.current.region },
    ]
    nodeSelector = {
      "strata/pool" = "brokers"
    }
  }
}

# --- keys and logs ------------------------------------------------------------------

resource "aws_kms_key" "cluster" {
  description         = "${var.name}: EKS secrets and control-plane logs"
  enable_key_rotation = true
  policy              = data.aws_iam_policy_document.cluster_key.json
  tags                = var.tags
}

data "aws_iam_policy_document" "cluster_key" {
  #checkov:skip=CKV_AWS_109:A key policy's Resource "*" is the key itself; this is AWS's default statement delegating access to the account's IAM policies.
  #checkov:skip=CKV_AWS_111:A key policy's Resource "*" is the key itself; this is AWS's default statement delegating access to the account's IAM policies.
  #checkov:skip=CKV_AWS_356:A key policy's Resource "*" is the key itself; this is AWS's default statement delegating access to the account's IAM policies.
  statement {
    sid       = "AccountAdministers"
    actions   = ["kms:*"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["arn:${local.partition}:iam::${local.account_id}:root"]
    }
  }

  statement {
    sid       = "CloudWatchLogsEncrypts"
    actions   = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
    resources = ["*"]
    principals {
      type        = "Service"
      identifiers = ["logs.${data.aws_region.current.region}.amazonaws.com"]
    }
    condition {
      test     = "ArnLike"
      variable = "kms:EncryptionContext:aws:logs:arn"
      values   = ["arn:${local.partition}:logs:${data.aws_region.current.region}:${local.account_id}:log-group:/aws/eks/${var.name}/cluster"]
    }
  }
}

resource "aws_cloudwatch_log_group" "cluster" {
  name              = "/aws/eks/${var.name}/cluster"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.cluster.arn
  tags              = var.tags
}

# --- the cluster ----------------------------------------------------------------------

data "aws_iam_policy_document" "cluster_assume" {
  statement {
    actions = ["sts:AssumeRole", "sts:TagSession"]
    principals {
      type        = "Service"
      identifiers = ["eks.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "cluster" {
  name               = "${var.name}-cluster"
  assume_role_policy = data.aws_iam_policy_document.cluster_assume.json
  tags               = var.tags
}

resource "aws_iam_role_policy_attachment" "cluster" {
  role       = aws_iam_role.cluster.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/AmazonEKSClusterPolicy"
}

resource "aws_eks_cluster" "this" {
  name     = var.name
  version  = var.kubernetes_version
  role_arn = aws_iam_role.cluster.arn

  enabled_cluster_log_types = ["api", "audit", "authenticator", "controllerManager", "scheduler"]

  access_config {
    authentication_mode                         = "API"
    bootstrap_cluster_creator_admin_permissions = true
  }

  vpc_config {
    subnet_ids              = values(var.private_subnet_ids_by_zone)
    endpoint_private_access = true
    endpoint_public_access  = length(var.endpoint_public_access_cidrs) > 0
    public_access_cidrs     = length(var.endpoint_public_access_cidrs) > 0 ? var.endpoint_public_access_cidrs : null
  }

  encryption_config {
    resources = ["secrets"]
    provider {
      key_arn = aws_kms_key.cluster.arn
    }
  }

  tags = var.tags

  depends_on = [aws_iam_role_policy_attachment.cluster, aws_cloudwatch_log_group.cluster]
}

# Kafka clients reach each broker at its pod address (VPC CNI: an address of the VPC).
resource "aws_vpc_security_group_ingress_rule" "kafka_clients" {
  count             = length(local.client_cidrs)
  security_group_id = aws_eks_cluster.this.vpc_config[0].cluster_security_group_id
  description       = "Kafka clients to the brokers"
  ip_protocol       = "tcp"
  from_port         = local.kafka_port
  to_port           = local.kafka_port
  cidr_ipv4         = local.client_cidrs[count.index]
}

# --- nodes ------------------------------------------------------------------------------

data "aws_iam_policy_document" "nodes_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "nodes" {
  name               = "${var.name}-nodes"
  assume_role_policy = data.aws_iam_policy_document.nodes_assume.json
  tags               = var.tags
}

resource "aws_iam_role_policy_attachment" "nodes" {
  for_each = toset([
    "AmazonEKSWorkerNodePolicy",
    "AmazonEKS_CNI_Policy",
    "AmazonEC2ContainerRegistryPullOnly",
  ])
  role       = aws_iam_role.nodes.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/${each.value}"
}

resource "aws_launch_template" "nodes" {
  name_prefix = "${var.name}-nodes-"
  description = "Strata broker nodes"
  user_data   = base64encode(local.node_user_data)

  # IMDSv2 only, and out of the pods' reach (one hop): brokers get credentials from
  # EKS Pod Identity, never from the node's role.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  block_device_mappings {
    device_name = "/dev/xvda"
    ebs {
      volume_size           = var.node_disk_gb
      volume_type           = "gp3"
      encrypted             = true
      delete_on_termination = true
    }
  }

  tag_specifications {
    resource_type = "instance"
    tags          = merge(var.tags, { Name = "${var.name}-broker-node" })
  }

  tags = var.tags
}

resource "aws_eks_node_group" "brokers" {
  for_each        = var.private_subnet_ids_by_zone
  cluster_name    = aws_eks_cluster.this.name
  node_group_name = "${var.name}-${each.key}"
  node_role_arn   = aws_iam_role.nodes.arn
  subnet_ids      = [each.value]
  ami_type        = "AL2023_x86_64_STANDARD"
  capacity_type   = "ON_DEMAND"
  instance_types  = var.node_instance_types

  scaling_config {
    min_size     = var.nodes_per_zone.min
    desired_size = var.nodes_per_zone.desired
    max_size     = var.nodes_per_zone.max
  }

  update_config {
    max_unavailable = 1
  }

  launch_template {
    id      = aws_launch_template.nodes.id
    version = aws_launch_template.nodes.latest_version
  }

  labels = {
    "strata/pool" = "brokers"
  }

  tags = var.tags

  # A cluster autoscaler owns the node count once the group exists.
  lifecycle {
    ignore_changes = [scaling_config[0].desired_size]
  }

  depends_on = [aws_iam_role_policy_attachment.nodes]
}

resource "aws_eks_addon" "this" {
  for_each                    = toset(["vpc-cni", "kube-proxy", "coredns", "eks-pod-identity-agent", "metrics-server"])
  cluster_name                = aws_eks_cluster.this.name
  addon_name                  = each.value
  resolve_conflicts_on_create = "OVERWRITE"
  resolve_conflicts_on_update = "OVERWRITE"
  tags                        = var.tags

  depends_on = [aws_eks_node_group.brokers]
}

# --- the brokers' AWS identity -----------------------------------------------------------

data "aws_iam_policy_document" "broker_assume" {
  statement {
    actions = ["sts:AssumeRole", "sts:TagSession"]
    principals {
      type        = "Service"
      identifiers = ["pods.eks.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

resource "aws_iam_role" "broker" {
  name               = "${var.name}-broker"
  assume_role_policy = data.aws_iam_policy_document.broker_assume.json
  tags               = var.tags
}

resource "aws_iam_role_policy_attachment" "broker" {
  role       = aws_iam_role.broker.name
  policy_arn = var.broker_policy_arn
}

resource "aws_eks_pod_identity_association" "broker" {
  cluster_name    = aws_eks_cluster.this.name
  namespace       = var.namespace
  service_account = local.service_account
  role_arn        = aws_iam_role.broker.arn
  tags            = var.tags
}

# --- the brokers ---------------------------------------------------------------------------

resource "helm_release" "strata" {
  name             = var.release_name
  namespace        = var.namespace
  create_namespace = true
  chart            = var.chart_path
  wait             = true
  timeout          = 900

  values = compact([yamlencode(local.chart_values), var.chart_values])

  set_sensitive = [
    {
      name  = "metadata.url"
      value = var.metadata_url
    },
  ]

  depends_on = [aws_eks_addon.this, aws_eks_pod_identity_association.broker, aws_iam_role_policy_attachment.broker]
}
