"""The OpenAI protocol, once: request and response models, the error envelope, SSE framing, request
ids and body handling. The server and the gateway both speak it through this package."""
