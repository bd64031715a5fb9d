"""The sandbox ESP: plays an email service provider over SFTP and HTTP for demos and tests."""
