"""The worker service: ``python -m services.worker my_module`` or ``polos worker my_module``."""
