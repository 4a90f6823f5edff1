"""The step API that users write against, and the reference agent steps."""
