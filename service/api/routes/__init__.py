"""Route modules: ``saes``, ``jobs``, ``health``."""
