"""HTTP: the app's wiring, middlewares, and the handlers along a request's path (auth, chat, upstream)."""
