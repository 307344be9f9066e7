"""The service's routes, one router per concern: predict, health, page."""
