"""Passwords of 8 characters or more that top the published lists of the most used (and first guessed) passwords
(SplashData, NordPass, NCSC's "100,000 Pwned Passwords"): refused whatever their case, as NIST SP 800-63B asks
of a password policy. Short, on purpose: the length rule and the login limits do the rest."""

COMMON_PASSWORDS = frozenset("""
00000000 11111111 12121212 12341234 12344321 123123123 12345678 123456789 1234567890 12345678910 123456789a
1234qwer 123qwe123 147258369 1q2w3e4r 1q2w3e4r5t 1qaz2wsx 1qazxsw2 22222222 55555555 66666666 654321654321
7777777777 87654321 88888888 987654321 9876543210 99999999 a1234567 a12345678 aa123456 aaaaaaaa abc12345
abcd1234 abcdefgh access14 adminadmin administrator asdf1234 asdfasdf asdfghjk asdfghjkl azerty123 babygirl1
baseball batman123 bigdaddy blahblah changeme charlie1 cheese123 chocolate computer corvette dallas123 danielle
dragon12 everton1 football football1 freedom1 gandalf1 gunners1 hello123 hellohello hunter12 iloveyou iloveyou1
iloveyou2 internet jennifer jessica1 jordan23 letmein1 liverpool liverpool1 loveyou1 mercedes michael1 michelle
midnight monkey12 mustang1 myspace1 nicole12 p@ssw0rd p@ssword pa55word pass1234 passw0rd password password!
password1 password12 password123 password1234 pokemon1 princess princess1 qazwsxedc qwer1234 qwerty12 qwerty123
qwerty1234 qwertyui qwertyuiop rockyou1 samantha shadow12 starwars sunshine sunshine1 superman superman1 trustno1
welcome1 welcome123 whatever zaq12wsx zxcvbnm1 zxcvbnm123
""".split())
