"""Using a trained model: chat, eval, eval-tools and the OpenAI-compatible server."""
