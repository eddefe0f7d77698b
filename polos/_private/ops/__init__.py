"""Operations: auth, embedded server and cluster, instance lock, retention, commands, plumbing."""
