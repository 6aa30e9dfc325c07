variable "name" {
  type        = string
  description = "Name of the database instance and prefix of its companion resources."
}

variable "vpc_id" {
  type        = string
  description = "VPC the database lives in."
}

variable "subnet_ids" {
  type        = list(string)
  description = "Private subnets of the database (at least two zones)."
}

variable "client_security_group_ids" {
  type        = list(string)
  description = "Security groups allowed to connect on the PostgreSQL port (the brokers' nodes)."
}

variable "engine_version" {
  type        = string
  description = "PostgreSQL major version."
  default     = "17"
}

variable "instance_class" {
  type        = string
  description = "Instance class. The metadata store sees one transaction per write-ahead flush per broker (40/s each at wal.flush.interval.ms=25) plus consumer offset commits."
  default     = "db.r7g.large"
}

variable "allocated_storage_gb" {
  type        = number
  description = "Initial storage in GiB (metadata is small: partitions, ranges, offsets)."
  default     = 50
}

variable "max_allocated_storage_gb" {
  type        = number
  description = "Storage autoscaling ceiling in GiB."
  default     = 500
}

variable "multi_az" {
  type        = bool
  description = "A synchronous standby in a second zone; losing the metadata store stops every write, so keep it on."
  default     = true
}

variable "backup_retention_days" {
  type        = number
  description = "Days of automated backups (point-in-time recovery window)."
  default     = 14
}

variable "deletion_protection" {
  type        = bool
  description = "Refuse to delete the database; turn off only to tear an experiment down."
  default     = true
}

variable "database_name" {
  type        = string
  description = "Database the brokers use."
  default     = "strata"
}

variable "username" {
  type        = string
  description = "Master user the brokers connect as."
  default     = "strata"
}

variable "force_ssl" {
  type        = bool
  description = "Make PostgreSQL refuse unencrypted connections (rds.force_ssl). Off until the broker's PostgreSQL client speaks TLS (docs/deploy.md); traffic stays inside the VPC's private subnets."
  default     = false
}

variable "tags" {
  type        = map(string)
  description = "Tags added to every resource."
  default     = {}
}
