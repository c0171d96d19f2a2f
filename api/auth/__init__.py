"""Authentication and authorization: API keys, OAuth 2, scopes, rate limits."""
