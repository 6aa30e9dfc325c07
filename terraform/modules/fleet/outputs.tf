output "cluster_name" {
  description = "Name of the EKS cluster."
  value       = aws_eks_cluster.this.name
}

output "cluster_endpoint" {
  description = "Kubernetes API endpoint."
  value       = aws_eks_cluster.this.endpoint
}

output "cluster_certificate_authority" {
  description = "Base64 certificate of the cluster's certificate authority."
  value       = aws_eks_cluster.this.certificate_authority[0].data
}

output "cluster_security_group_id" {
  description = "Security group EKS attaches to the control plane and the managed nodes."
  value       = aws_eks_cluster.this.vpc_config[0].cluster_security_group_id
}

output "broker_role_arn" {
  description = "IAM role the brokers assume through EKS Pod Identity."
  value       = aws_iam_role.broker.arn
}

output "bootstrap_servers" {
  description = "bootstrap.servers for clients inside the cluster."
  value       = "${var.release_name}.${var.namespace}.svc:${local.kafka_port}"
}

output "namespace" {
  description = "Namespace of the brokers."
  value       = helm_release.strata.namespace
}
