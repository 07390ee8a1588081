"""The taxonomy knowledge base: schema, loading, validation, citation."""
