"""What a server keeps on its host: its config file, and files written atomically and erased."""
