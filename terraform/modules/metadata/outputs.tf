output "address" {
  description = "Host name of the database."
  value       = aws_db_instance.this.address
}

output "port" {
  description = "PostgreSQL port."
  value       = aws_db_instance.this.port
}

output "database_name" {
  description = "Database the brokers use."
  value       = aws_db_instance.this.db_name
}

output "username" {
  description = "User the brokers connect as."
  value       = aws_db_instance.this.username
}

output "url" {
  description = "The brokers' metadata store URL (STRATA_METADATA), password included."
  value       = "postgres://${aws_db_instance.this.username}:${random_password.master.result}@${aws_db_instance.this.address}:${aws_db_instance.this.port}/${aws_db_instance.this.db_name}"
  sensitive   = true
}

output "security_group_id" {
  description = "Security group of the database."
  value       = aws_security_group.db.id
}
