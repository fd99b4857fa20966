"""compactvl."""
