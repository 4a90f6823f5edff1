"""The application: settings, the CLI, pipeline assembly and the local stack."""
