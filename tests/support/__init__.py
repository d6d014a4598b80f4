"""Test helpers: a moto S3 server on loopback (`s3`) and a fault-injecting proxy (`faultproxy`)."""
