"""Generated wire code (do not edit): see proto/."""
