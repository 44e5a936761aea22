"""The OpenAI Responses dialect: its route and the translation of the model replica's chat
output into a Response and the Responses stream events."""
