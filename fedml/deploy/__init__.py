"""Deployment at data sites: `fedml server` (a Flower SuperLink running our ServerApp)
and `fedml client` (a Flower SuperNode running our ClientApp on the site's data)."""
