"""lorcserve's OpenAI-compatible HTTP gateway (gateway/README.md)."""
