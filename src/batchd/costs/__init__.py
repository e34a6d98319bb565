"""What batches cost and saved: the price table, and the arithmetic over token usage."""
