"""The self-contained transformers model files copied into every exported directory (not imported by the
framework itself, except by tests, which load them both from here and from an exported directory)."""
