"""Marshmallow schemas: they serialize every response and document the OpenAPI spec."""
