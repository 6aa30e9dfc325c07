variable "bucket_name" {
  type        = string
  description = "Name of the bucket holding the log (globally unique)."
}

variable "prefix" {
  type        = string
  description = "Key prefix of this cluster's objects in the bucket (object store URL s3://BUCKET/PREFIX); the broker policy covers only this prefix."
  default     = "cluster"

  validation {
    condition     = can(regex("^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9._-]+)*$", var.prefix))
    error_message = "The prefix is one or more path segments without leading or trailing slashes."
  }
}

variable "abort_incomplete_multipart_upload_days" {
  type        = number
  description = "Days after which S3 aborts a multipart upload that was never completed (a broker that died mid-upload leaves one)."
  default     = 1
}

variable "noncurrent_version_expiration_days" {
  type        = number
  description = "Days a deleted or replaced object's version is kept (versioning guards against accidental deletes; brokers never overwrite objects, retention and garbage collection delete them)."
  default     = 7
}

variable "force_destroy" {
  type        = bool
  description = "Let `terraform destroy` delete a bucket that still holds objects. Leave false outside experiments."
  default     = false
}

variable "tags" {
  type        = map(string)
  description = "Tags added to every resource."
  default     = {}
}
