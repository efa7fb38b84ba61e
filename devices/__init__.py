"""Device profiles (target, memory budget) and how to reach each device."""
