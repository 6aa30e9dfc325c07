output "vpc_id" {
  description = "ID of the VPC."
  value       = aws_vpc.this.id
}

output "vpc_cidr" {
  description = "IPv4 CIDR of the VPC."
  value       = aws_vpc.this.cidr_block
}

output "private_subnet_ids" {
  description = "Private subnets, in the order of var.zones (nodes, pods and the database live here)."
  value       = aws_subnet.private[*].id
}

output "private_subnet_ids_by_zone" {
  description = "Private subnet of each zone, keyed by zone name."
  value       = { for i, zone in var.zones : zone => aws_subnet.private[i].id }
}

output "public_subnet_ids" {
  description = "Public subnets, in the order of var.zones (NAT gateways and internet-facing load balancers)."
  value       = aws_subnet.public[*].id
}

output "private_route_table_ids" {
  description = "Route tables of the private subnets (each routes S3 through the gateway endpoint)."
  value       = aws_route_table.private[*].id
}

output "s3_endpoint_id" {
  description = "ID of the S3 gateway endpoint."
  value       = aws_vpc_endpoint.s3.id
}
