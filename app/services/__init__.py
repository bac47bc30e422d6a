"""The app service by tab; app/service.py composes them into AppService."""
