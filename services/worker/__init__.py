"""The worker service: ``python -m polos_services.worker my_module`` or ``polos worker my_module``."""
