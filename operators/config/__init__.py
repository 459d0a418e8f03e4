"""The configuration: its typed schema and identity (schema), loading YAML files and --set
overrides with their bounds (loading), and secrets: which options hold one and how text is
redacted (secrets).

May import: methods (the names of poolings and post-processing steps the schema validates).
"""
