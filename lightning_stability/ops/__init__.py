"""Pure torch math behind the callbacks: no Lightning import here."""
