variable "name" {
  type        = string
  description = "Name of the EKS cluster and prefix of its companion resources."
}

variable "kubernetes_version" {
  type        = string
  description = "Kubernetes version of the EKS cluster."
  default     = "1.34"
}

variable "vpc_id" {
  type        = string
  description = "VPC of the cluster."
}

variable "vpc_cidr" {
  type        = string
  description = "CIDR of the VPC; clients inside it may reach the brokers."
}

variable "private_subnet_ids_by_zone" {
  type        = map(string)
  description = "Private subnet of each zone, keyed by zone name: one node group per zone, and one broker Deployment per zone."
}

variable "endpoint_public_access_cidrs" {
  type        = list(string)
  description = "CIDRs allowed to reach the Kubernetes API over the internet (where Terraform and operators run). Empty: the API is private to the VPC."
  default     = []
}

variable "client_cidrs" {
  type        = list(string)
  description = "CIDRs of Kafka clients allowed to the brokers' port; defaults to the VPC's CIDR."
  default     = []
}

variable "node_instance_types" {
  type        = list(string)
  description = "Instance types of the broker nodes. Types with local NVMe (the `d` variants) hold the cache on instance storage."
  default     = ["m6id.2xlarge"]
}

variable "nodes_per_zone" {
  type = object({
    min     = number
    desired = number
    max     = number
  })
  description = "Node count bounds of each zone's node group (a cluster autoscaler moves within them)."
  default = {
    min     = 1
    desired = 1
    max     = 4
  }
}

variable "node_disk_gb" {
  type        = number
  description = "Root EBS volume of each node, in GiB (images and logs; the cache lives on instance storage when the type has it)."
  default     = 50
}

variable "log_retention_days" {
  type        = number
  description = "Days to keep the control plane's logs."
  default     = 365
}

variable "namespace" {
  type        = string
  description = "Kubernetes namespace of the brokers."
  default     = "strata"
}

variable "release_name" {
  type        = string
  description = "Helm release name of the brokers."
  default     = "strata"
}

variable "chart_path" {
  type        = string
  description = "Path of the Strata Helm chart (deploy/helm/strata in this repository)."
}

variable "image_repository" {
  type        = string
  description = "Container image repository of the broker (built from deploy/Dockerfile)."
}

variable "image_tag" {
  type        = string
  description = "Image tag to deploy."
}

variable "object_store_url" {
  type        = string
  description = "Object store URL of the brokers (s3://BUCKET/PREFIX)."
}

variable "broker_policy_arn" {
  type        = string
  description = "IAM policy granting the brokers their bucket prefix (the storage module's broker_policy_arn)."
}

variable "metadata_url" {
  type        = string
  description = "Metadata store URL of the brokers (postgres://USER:PASSWORD@HOST:PORT/DB)."
  sensitive   = true
}

variable "chart_values" {
  type        = string
  description = "More chart values as YAML, applied over the ones this module sets (see deploy/helm/strata/values.yaml)."
  default     = ""
}

variable "tags" {
  type        = map(string)
  description = "Tags added to every resource."
  default     = {}
}
