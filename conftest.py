from properties.profiles import register_profiles

PROFILE = register_profiles()


def pytest_report_header(config):
    return f"hypothesis profile: {PROFILE}"
