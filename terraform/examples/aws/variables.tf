variable "region" {
  type        = string
  description = "AWS region of the whole deployment."
  default     = "us-east-1"
}

variable "name" {
  type        = string
  description = "Name of the deployment: prefixes the VPC, cluster, database and roles."
  default     = "strata"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,30}$", var.name))
    error_message = "Use 2-31 lowercase letters, digits and dashes, starting with a letter."
  }
}

variable "zones" {
  type        = list(string)
  description = "Availability zones (names, in var.region) to spread over: one private subnet, node group and broker Deployment each; the database's standby uses a second one. Listed, not looked up, so the set never changes when AWS adds a zone."
  default     = ["us-east-1a", "us-east-1b", "us-east-1c"]

  validation {
    condition     = length(var.zones) >= 2 && alltrue([for z in var.zones : startswith(z, var.region)])
    error_message = "List at least two availability zones of var.region."
  }
}

variable "vpc_cidr" {
  type        = string
  description = "IPv4 CIDR of the VPC."
  default     = "10.0.0.0/16"
}

variable "bucket_name" {
  type        = string
  description = "Bucket holding the log; empty picks NAME-log-ACCOUNT_ID."
  default     = ""
}

variable "kubernetes_version" {
  type        = string
  description = "Kubernetes version of the EKS cluster."
  default     = "1.34"
}

variable "node_instance_types" {
  type        = list(string)
  description = "Instance types of the broker nodes (with local NVMe for the cache, e.g. m6id, c6id, i4i)."
  default     = ["m6id.2xlarge"]
}

variable "nodes_per_zone" {
  type = object({
    min     = number
    desired = number
    max     = number
  })
  description = "Node count bounds of each zone's node group."
  default = {
    min     = 1
    desired = 1
    max     = 4
  }
}

variable "api_allowed_cidrs" {
  type        = list(string)
  description = "CIDRs allowed to the Kubernetes API from the internet (where Terraform runs, since it installs the chart). Empty: a private API, reachable from the VPC only."
  default     = []
}

variable "client_cidrs" {
  type        = list(string)
  description = "CIDRs of Kafka clients allowed to reach the brokers; empty allows the VPC."
  default     = []
}

variable "db_instance_class" {
  type        = string
  description = "Instance class of the PostgreSQL metadata store."
  default     = "db.r7g.large"
}

variable "deletion_protection" {
  type        = bool
  description = "Protect the database from deletion (turn off only to tear an experiment down)."
  default     = true
}

variable "image_tag" {
  type        = string
  description = "Tag of the broker image in the ECR repository this configuration creates (push it first: docs/deploy.md)."
}

variable "chart_values" {
  type        = string
  description = "More Helm values for the brokers, as YAML (deploy/helm/strata/values.yaml lists them)."
  default     = ""
}

variable "tags" {
  type        = map(string)
  description = "Tags added to every resource."
  default     = {}
}
