"""The HTTP adapter: parse the request, call a service, map typed errors to problem+json."""
