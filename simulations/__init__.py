"""Engines that run fedml's ServerApp and ClientApp on one machine, and scenarios."""
