from ftkit.cli.main import main

main()
