"""The edges of billing, one module per technology: the SQL store, files, ClickHouse usage, statement files."""
