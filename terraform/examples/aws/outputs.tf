output "bootstrap_servers" {
  description = "bootstrap.servers for Kafka clients inside the cluster (clients elsewhere in the VPC reach the brokers' pod addresses; see docs/deploy.md)."
  value       = module.fleet.bootstrap_servers
}

output "cluster_name" {
  description = "Name of the EKS cluster."
  value       = module.fleet.cluster_name
}

output "kubeconfig_command" {
  description = "Command that points kubectl at the cluster."
  value       = "aws eks update-kubeconfig --region ${var.region} --name ${module.fleet.cluster_name}"
}

output "image_repository" {
  description = "ECR repository to push the broker image to (docker build -f deploy/Dockerfile .)."
  value       = aws_ecr_repository.strata.repository_url
}

output "zones" {
  description = "Availability zones the fleet spans (one broker Deployment and node group each)."
  value       = var.zones
}

output "bucket_name" {
  description = "Bucket holding the log."
  value       = module.storage.bucket_name
}

output "object_store_url" {
  description = "The brokers' object store URL."
  value       = module.storage.object_store_url
}

output "metadata_address" {
  description = "Host name of the PostgreSQL metadata store."
  value       = module.metadata.address
}

output "metadata_url" {
  description = "The brokers' metadata store URL, password included."
  value       = module.metadata.url
  sensitive   = true
}

output "broker_role_arn" {
  description = "IAM role the brokers assume (EKS Pod Identity)."
  value       = module.fleet.broker_role_arn
}
