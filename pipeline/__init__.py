"""State Farm Distracted Driver Detection: from raw data to a calibrated, validated submission."""
