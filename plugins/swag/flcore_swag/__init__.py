"""Federated SWAG uncertainty (Maddox et al. 2019) for flcore.

Being built: see the project's issues."""
