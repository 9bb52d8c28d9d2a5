"""One module per reference mode. Each returns a result dataclass and never prints."""
