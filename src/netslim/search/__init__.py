"""Cross-family compression search: targets with measured cost."""
