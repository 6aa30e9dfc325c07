variable "name" {
  type        = string
  description = "Name prefix of every resource of the network (e.g. strata-prod)."
}

variable "cidr" {
  type        = string
  description = "IPv4 CIDR of the VPC. A /16 leaves room for a pod address per broker with the VPC CNI."
  default     = "10.0.0.0/16"
}

variable "zones" {
  type        = list(string)
  description = "Availability zones to spread over (one public and one private subnet each); brokers run in every one."

  validation {
    condition     = length(var.zones) >= 2
    error_message = "Name at least two availability zones: a fleet in one zone does not survive losing it."
  }
}

variable "single_nat_gateway" {
  type        = bool
  description = "One NAT gateway for every zone (cheaper, but a zone outage cuts the others' egress) instead of one per zone."
  default     = false
}

variable "flow_log_retention_days" {
  type        = number
  description = "Days to keep the VPC flow logs in CloudWatch Logs."
  default     = 365
}

variable "tags" {
  type        = map(string)
  description = "Tags added to every resource."
  default     = {}
}
