from lorakit.cli.entry import main

main()
