"""The scheduler: receives invocations, keeps a cluster view, places, forwards, retries."""
