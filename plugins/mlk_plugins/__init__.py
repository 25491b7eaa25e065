"""mlk's builtin plugins, declared as entry points exactly as a third party declares its own."""
