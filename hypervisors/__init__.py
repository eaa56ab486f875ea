"""hypervisors package."""
