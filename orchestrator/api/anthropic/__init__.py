"""The Anthropic Messages dialect: its routes, its error envelope, and the translation of
the model replica's chat output into Anthropic's message and stream events."""
